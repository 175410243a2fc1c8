"""The teacher's live grid: ws/classes/SLUG/ (panel/classroom/consumers.py) and its
sampler (panel/classroom/sampler.py).

Who may open it (the class's teacher and TAs, staff; never a student, another
class's teacher or a stranger), what each sees (a TA only the rows of their
groups, never one of another group's student, however the rows and events
come), and what it costs: one GET /1.0/stats per host and interval for every
grid watching a class, and nothing while none watches. Then, against a real
agent, a student's server stopped reaches the teacher's grid as a status
change, with the running servers' CPU and memory, on one agent connection.

Both channel layers (tests/panel/live/conftest.py's `channel_layer`). The
agent is pretended (an httpx transport answering GET /1.0/stats) except in the
last tests, which are root only and end their agent and guests at teardown.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
from collections import Counter
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import httpx
import pytest
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from hostagent import wire
from panel.classroom import sampler
from panel.classroom.models import ClassGroup, Seat, TeachingAssistant
from panel.guests import actions as gactions
from panel.guests import consumers, events
from panel.guests.choices import VServerStatusChoices
from panel.guests.models import VServer
from panel.hosting.models import Host
from tests.classroom import realclass
from tests.classroom.conftest import School, add_students
from tests.panel.live import conftest as live_conftest
from tests.panel.live.helpers import (
    closed_with,
    communicator,
    connect,
    messages_until,
    no_message,
    run,
    session_cookie,
    sync,
)

channel_layer = live_conftest.channel_layer
redis_url = live_conftest.redis_url

MIB = 1024 * 1024


def _seat(username: str) -> Seat:
    return Seat.objects.select_related("vserver", "user").get(user__username=username)


def _vs(username: str) -> VServer:
    vs = _seat(username).vserver
    assert vs is not None
    return vs


# --- a pretend agent: GET /1.0/stats of every host, counted ------------------------------------

def usage_row(name: str, cpu_seconds: float, uptime: float, memory: int) -> dict[str, Any]:
    """One row of GET /1.0/stats (every field of wire.Usage, so that it parses)."""
    row: dict[str, Any] = {f.name: None for f in dataclasses.fields(wire.Usage)}
    row.update(name=name, context=1000, cgroup=f"vpanel/{name}", processes=3,
               cpu_seconds=cpu_seconds, uptime=uptime, memory_current=memory)
    return row


class PretendAgents:
    """Every host's agent: each running guest uses half a core and MEMORY bytes; the
    stats calls are counted per host."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.running: dict[str, set[str]] = {}  # agent socket -> running guests
        self.memory = 64 * MIB
        self.clock = 100.0  # the guests' uptime, one second more at every call

    def transport(self, socket: str) -> httpx.AsyncBaseTransport:
        def answer(request: httpx.Request) -> httpx.Response:
            assert request.method == "GET" and request.url.path == "/1.0/stats", request.url
            self.calls[socket] += 1
            self.clock += 1.0
            return httpx.Response(200, json=[
                usage_row(n, cpu_seconds=self.clock / 2, uptime=self.clock, memory=self.memory)
                for n in sorted(self.running.get(socket, ()))])

        return httpx.MockTransport(answer)


@pytest.fixture
def agents(monkeypatch: pytest.MonkeyPatch) -> Iterator[PretendAgents]:
    """The process's sampler on pretend agents, sampling every 0.1 s; clean before and after."""
    fake = PretendAgents()
    monkeypatch.setattr(sampler.SAMPLER, "transport", fake.transport)
    monkeypatch.setattr(sampler.SAMPLER, "interval", 0.1)
    sampler.SAMPLER.reset()
    yield fake
    sampler.SAMPLER.reset()


@pytest.fixture
def klass(school: School, agents: PretendAgents) -> School:
    """cs101: ann and ben in lab-a (the TA tom's group), cat in lab-b on a second host,
    all running; cs202: dan."""
    add_students(school, school.cs101, "ann", "ben", group="lab-a")
    add_students(school, school.cs101, "cat", group="lab-b")
    add_students(school, school.cs202, "dan")
    for name in ("ann", "ben", "cat", "dan"):
        school.users[name] = _seat(name).user
    node2 = Host.objects.create(name="node2", agent_socket="/nonexistent/agent2.sock",
                                memory_mb=1_000_000, cpu_cores=Decimal(512), disk_gb=100_000,
                                max_vservers=2000)
    VServer.objects.filter(pk=_vs("cat").pk).update(host=node2)
    VServer.objects.update(status=VServerStatusChoices.STATUS_RUNNING)
    agents.running = {school.host.agent_socket: {"cs101-ann", "cs101-ben", "cs202-dan"},
                      node2.agent_socket: {"cs101-cat"}}
    return school


GRID = "/ws/classes/cs101/"


@pytest.fixture
def cookies(klass: School) -> dict[str, str]:
    """A logged-in session of everyone of the school, by name."""
    return {who: session_cookie(user) for who, user in klass.users.items()}


def is_usage(m: dict[str, Any]) -> bool:
    return m["type"] == "usage"


def is_full_usage(m: dict[str, Any]) -> bool:
    """A usage message whose running rows all have a CPU figure (a second sample)."""
    return is_usage(m) and all(r["cpu"] is not None for r in m["rows"] if r["running"])


def set_status(vs_id: int, status: str) -> None:
    """What a lifecycle change does: the row, then its event."""
    VServer.objects.filter(pk=vs_id).update(status=status)
    events.vserver_changed(vs_id)


# --- who may open it -----------------------------------------------------------------------------

@pytest.mark.django_db(transaction=True)
def test_the_grid_refuses_no_session_a_student_another_classs_teacher_and_a_stranger(
        channel_layer: str, klass: School, cookies: dict[str, str]) -> None:
    refused = {who: cookies[who] for who in ("ann", "teacher2", "outsider")}
    cookie = cookies["teacher"]

    async def go() -> None:
        code, _ = await closed_with(communicator(GRID))
        assert code == consumers.CLOSE_LOGIN
        for who, theirs in refused.items():
            code, reason = await closed_with(communicator(GRID, theirs))
            assert (code, reason) == (consumers.CLOSE_MISSING, "no such class"), who
        # A class that does not exist answers the same.
        assert await closed_with(communicator("/ws/classes/nope/", cookie)) == (
            consumers.CLOSE_MISSING, "no such class")
        # Another site's page: refused at the handshake (panel/asgi.py).
        foreign = communicator(GRID, cookie, origin=b"http://evil.example")
        connected, _ = await foreign.connect()
        assert not connected

    run(go)


@pytest.mark.django_db(transaction=True)
def test_a_teacher_who_leaves_the_class_has_their_grid_closed(
        channel_layer: str, klass: School, cookies: dict[str, str]) -> None:
    from panel.hosting.models import Membership

    def leave() -> None:
        Membership.objects.filter(user=klass.users["teacher"],
                                  customer=klass.cs101.customer).delete()

    async def go() -> None:
        grid, _ = await connect(GRID, cookies["teacher"])
        await sync(leave)()
        assert await closed_with(grid, connect=False) == (consumers.CLOSE_MISSING,
                                                          "no such class")

    run(go)


# --- what each sees ------------------------------------------------------------------------------

@pytest.mark.django_db(transaction=True)
def test_a_teacher_sees_every_seat_and_a_ta_the_seats_of_their_groups(
        channel_layer: str, klass: School, cookies: dict[str, str]) -> None:
    ann, ben, cat = _seat("ann"), _seat("ben"), _seat("cat")

    async def go() -> None:
        grid, state = await connect(GRID, cookies["teacher"])
        tas, ta_state = await connect(GRID, cookies["ta"])
        staff, staff_state = await connect(GRID, cookies["staff"])
        assert {v["name"] for v in state["vservers"]} == {"cs101-ann", "cs101-ben", "cs101-cat"}
        assert {v["name"] for v in staff_state["vservers"]} == {v["name"] for v in
                                                                  state["vservers"]}
        assert {v["name"] for v in ta_state["vservers"]} == {"cs101-ann", "cs101-ben"}
        for comm in (grid, tas, staff):
            await comm.send_json_to({"type": "watch-usage"})
        seen = {}
        for who, comm in (("teacher", grid), ("ta", tas), ("staff", staff)):
            msg = (await messages_until(comm, is_full_usage))[-1]
            seen[who] = {r["seat"]: r for r in msg["rows"]}
        assert set(seen["teacher"]) == set(seen["staff"]) == {ann.pk, ben.pk, cat.pk}
        assert set(seen["ta"]) == {ann.pk, ben.pk}
        row = seen["teacher"][cat.pk]
        # Half a core (the pretend agent's), its memory against the server's limit.
        assert (row["running"], row["cpu"], row["memory"], row["memory_mb"]) == (
            True, 50.0, 64 * MIB, cat.vserver.memory_mb if cat.vserver else None)
        assert row["activity"] == "—" and "group" not in row  # no group ids to the page
        for comm in (grid, tas, staff):
            await comm.disconnect()

    run(go)


@pytest.mark.django_db(transaction=True)
def test_a_tas_socket_never_receives_a_row_of_another_groups_student(
        channel_layer: str, klass: School, cookies: dict[str, str]) -> None:
    """Whatever reaches the class: status changes, deletions, samples of every seat."""
    ann, cat = _vs("ann"), _vs("cat")
    cat_seat = _seat("cat").pk
    theirs = {_seat("ann").pk, _seat("ben").pk}

    def delete_cat() -> None:
        Seat.objects.filter(pk=cat_seat).update(vserver=None)
        VServer.objects.filter(pk=cat.pk).delete()
        events.vserver_changed(cat.pk, customer_id=klass.cs101.customer_id)

    async def go() -> None:
        ta, _ = await connect(GRID, cookies["ta"])
        teacher, _ = await connect(GRID, cookies["teacher"])
        await ta.send_json_to({"type": "watch-usage"})
        await teacher.send_json_to({"type": "watch-usage"})
        got: list[dict[str, Any]] = []
        for status in ("stopping", "stopped"):
            await sync(set_status)(cat.pk, status)
            await messages_until(teacher, lambda m, s=status: m["type"] == "vserver"
                                 and m["vserver"]["status"] == s)
        await sync(set_status)(ann.pk, "stopping")  # one of the TA's: it comes, after cat's
        got += await messages_until(ta, lambda m: m["type"] == "vserver")
        await sync(delete_cat)()
        await messages_until(teacher, lambda m: m["type"] == "deleted")
        got += await messages_until(ta, is_usage)
        got += await messages_until(ta, is_usage)
        assert [m["vserver"]["id"] for m in got if m["type"] == "vserver"] == [ann.pk]
        assert not [m for m in got if m["type"] == "deleted"]
        rows = [r for m in got if is_usage(m) for r in m["rows"]]
        assert rows and {r["seat"] for r in rows} <= theirs
        assert cat.pk not in {r["vserver"] for r in rows}
        await ta.disconnect()
        await teacher.disconnect()

    run(go)


@pytest.mark.django_db(transaction=True)
def test_a_ta_whose_group_is_taken_away_stops_getting_its_rows_at_once(
        channel_layer: str, klass: School, cookies: dict[str, str]) -> None:
    """No signal tells of a TA's groups: each event and sample is checked as it comes."""
    ann = _vs("ann")

    def take_away() -> None:
        TeachingAssistant.objects.filter(membership__user=klass.users["ta"]).delete()

    async def go() -> None:
        ta, _ = await connect(GRID, cookies["ta"])
        await ta.send_json_to({"type": "watch-usage"})
        assert (await messages_until(ta, is_usage))[-1]["rows"]
        await sync(take_away)()
        await sync(set_status)(ann.pk, "stopping")
        # The page is told to take ann's row off, and hears nothing more of it.
        got = await messages_until(ta, lambda m: m["type"] == "hidden")
        assert got[-1]["vserver"] == {"id": ann.pk}
        assert not [m for m in got if m["type"] == "vserver"]
        got = await messages_until(ta, lambda m: is_usage(m) and not m["rows"])
        got += await messages_until(ta, is_usage)
        assert not got[-1]["rows"]
        await sync(set_status)(ann.pk, "stopped")
        got = await messages_until(ta, is_usage)
        assert not [m for m in got if m["type"] == "vserver"] and not got[-1]["rows"]
        await ta.disconnect()

    run(go)


@pytest.mark.django_db(transaction=True)
def test_a_students_live_pages_hear_of_their_own_server_only(
        channel_layer: str, klass: School, cookies: dict[str, str]) -> None:
    """The student's page (/my-server/, over the dashboard's socket) follows their own
    server; a classmate's change is never sent to it, though both are in the class's
    group."""
    ann, ben = _vs("ann"), _vs("ben")

    async def go() -> None:
        page, state = await connect("/ws/vservers/", cookies["ann"])
        assert [v["id"] for v in state["vservers"]] == [ann.pk]
        await sync(set_status)(ben.pk, "stopping")
        await sync(set_status)(ann.pk, "stopping")
        msg = await page.receive_json_from()
        assert (msg["type"], msg["vserver"]["id"], msg["vserver"]["status"]) == (
            "vserver", ann.pk, "stopping")
        await no_message(page)
        await page.disconnect()

    run(go)


@pytest.mark.django_db(transaction=True)
def test_a_tas_server_page_closes_once_the_students_group_is_no_longer_theirs(
        channel_layer: str, klass: School, cookies: dict[str, str]) -> None:
    ann = _vs("ann")

    def move_ann() -> None:
        lab_b = ClassGroup.objects.get(classroom=klass.cs101, name="lab-b")
        Seat.objects.filter(vserver=ann).update(group=lab_b)

    async def go() -> None:
        page, _ = await connect(f"/ws/vservers/{ann.pk}/", cookies["ta"])
        await sync(move_ann)()
        await sync(set_status)(ann.pk, "stopping")
        assert await closed_with(page, connect=False) == (consumers.CLOSE_MISSING,
                                                          "no such vserver")

    run(go)


def test_the_live_rule_agrees_with_visible_to_for_everyone_of_the_school(
        klass: School) -> None:
    users = list(klass.users.values())
    for vs in VServer.objects.all():
        viewers = consumers._viewers_among(vs.customer_id, vs.pk, [u.pk for u in users])
        expected = {u.pk for u in users if not u.is_staff
                    and VServer.objects.visible_to(u).filter(pk=vs.pk).exists()}
        assert viewers == expected, vs.name


# --- what it costs -------------------------------------------------------------------------------

@pytest.mark.django_db(transaction=True)
def test_many_grids_of_a_class_share_one_stats_call_per_host_and_interval(
        channel_layer: str, klass: School, agents: PretendAgents, cookies: dict[str, str]) -> None:
    sessions = [cookies[w] for w in ("teacher", "teacher", "ta", "staff")]

    async def go() -> None:
        grids = [(await connect(GRID, c))[0] for c in sessions]
        for g in grids:
            await g.send_json_to({"type": "watch-usage"})
        for g in grids:
            for _ in range(3):
                await messages_until(g, is_usage)
        assert sampler.SAMPLER.watchers(klass.cs101.pk) == len(grids)
        assert sampler.SAMPLER.tasks() == 1
        for g in grids:
            await g.disconnect()
        assert sampler.SAMPLER.tasks() == 0 and sampler.SAMPLER.watchers(klass.cs101.pk) == 0
        ticks = sampler.SAMPLER.ticks
        assert ticks >= 3
        # Each host once a sample (one more if the last was cut short by the last leaving).
        for socket in ("/nonexistent/agent.sock", "/nonexistent/agent2.sock"):
            assert ticks <= agents.calls[socket] <= ticks + 1, (agents.calls, ticks)
        assert sampler.SAMPLER.asked == sum(agents.calls.values())

    run(go)


@pytest.mark.django_db(transaction=True)
def test_nothing_is_sampled_while_no_grid_watches(
        channel_layer: str, klass: School, agents: PretendAgents, cookies: dict[str, str]) -> None:
    async def go() -> None:
        # Open, but not watching (a hidden tab): statuses only.
        grid, _ = await connect(GRID, cookies["teacher"])
        await asyncio.sleep(0.5)
        assert sampler.SAMPLER.tasks() == 0 and not agents.calls
        await grid.send_json_to({"type": "watch-usage"})
        await messages_until(grid, is_usage)
        await grid.send_json_to({"type": "unwatch-usage"})
        await grid.send_json_to({"type": "ping"})
        await messages_until(grid, lambda m: m["type"] == "pong")
        assert sampler.SAMPLER.tasks() == 0
        asked = sum(agents.calls.values())
        await asyncio.sleep(0.5)  # five intervals
        assert sum(agents.calls.values()) == asked
        await grid.disconnect()

    run(go)


@pytest.mark.django_db(transaction=True)
def test_a_grid_coming_to_a_watched_class_gets_the_last_sample_at_once(
        channel_layer: str, klass: School, agents: PretendAgents,
        monkeypatch: pytest.MonkeyPatch, cookies: dict[str, str]) -> None:
    theirs = {_seat("ann").pk, _seat("ben").pk}  # the TA's

    async def go() -> None:
        first, _ = await connect(GRID, cookies["teacher"])
        await first.send_json_to({"type": "watch-usage"})
        await messages_until(first, is_full_usage)
        monkeypatch.setattr(sampler.SAMPLER, "interval", 3600.0)  # no tick after this one
        await messages_until(first, is_usage)
        second, _ = await connect(GRID, cookies["ta"])
        await second.send_json_to({"type": "watch-usage"})
        msg = await second.receive_json_from()
        assert is_usage(msg) and {r["seat"] for r in msg["rows"]} == theirs
        await first.disconnect()
        await second.disconnect()

    run(go)


@pytest.mark.django_db(transaction=True)
def test_a_host_that_does_not_answer_is_said_and_the_others_still_show(
        channel_layer: str, klass: School, agents: PretendAgents,
        monkeypatch: pytest.MonkeyPatch, cookies: dict[str, str]) -> None:
    pretend = agents.transport

    def one_down(socket: str) -> httpx.AsyncBaseTransport:
        if socket.endswith("agent2.sock"):
            return httpx.AsyncHTTPTransport(uds=socket)  # no such socket
        return pretend(socket)

    monkeypatch.setattr(sampler.SAMPLER, "transport", one_down)
    cat = _seat("cat").pk

    async def go() -> None:
        grid, _ = await connect(GRID, cookies["teacher"])
        await grid.send_json_to({"type": "watch-usage"})
        rows = {r["seat"]: r for r in (await messages_until(grid, is_full_usage))[-1]["rows"]}
        assert rows[cat]["running"] is None and rows[cat]["error"]
        assert [r["running"] for s, r in rows.items() if s != cat] == [True, True]
        await grid.disconnect()

    run(go)


# --- the pages -----------------------------------------------------------------------------------

def test_the_grid_and_the_students_page_load_their_live_scripts(klass: School) -> None:
    ben = _seat("ben")
    Seat.objects.filter(pk=ben.pk).update(last_activity=timezone.now() - dt.timedelta(
        minutes=7, seconds=30))
    c = Client()
    c.force_login(klass.users["teacher"])
    body = c.get(reverse("class_detail", args=["cs101"]) + "?sort=username").content.decode()
    assert 'data-vp-live="/ws/classes/cs101/" data-vp-watch="usage"' in body
    assert 'data-vp-page="/classes/cs101/?sort=username"' in body
    assert 'src="/static/js/live.js"' in body and 'src="/static/js/classroom.js"' in body
    assert '<td data-vp-usage="activity">7 min ago</td>' in body
    c.force_login(klass.users["ann"])
    body = c.get(reverse("student_home")).content.decode()
    assert 'data-vp-live="/ws/vservers/"' in body and 'src="/static/js/live.js"' in body


def test_opening_a_grid_reads_the_class_in_the_same_queries_however_many_students(
        klass: School) -> None:
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from panel.classroom.consumers import ClassConsumer

    def queries_to_open() -> tuple[int, int]:
        grid = ClassConsumer()
        grid.user, grid.classroom_id = klass.users["teacher"], klass.cs101.pk
        with CaptureQueriesContext(connection) as ctx:
            _, snaps = grid._state()
        return len(ctx.captured_queries), len(snaps)

    before, shown = queries_to_open()
    add_students(klass, klass.cs101, *(f"s{i:02d}" for i in range(12)))
    after, shown_after = queries_to_open()
    assert (shown, shown_after) == (3, 15)
    assert after == before, f"{before} queries for 3 servers, {after} for 15"


@pytest.mark.parametrize(("minutes", "text"), [
    (None, "—"), (0, "0 min ago"), (7.5, "7 min ago"), (119, "119 min ago"), (120, "2 h ago"),
    (47 * 60 + 59, "47 h ago"), (48 * 60, "2 d ago"), (-3, "0 min ago")])
def test_last_activity_reads_as_minutes_ago(minutes: float | None, text: str) -> None:
    now = dt.datetime(2025, 3, 3, 10, 0, tzinfo=dt.UTC)
    when = None if minutes is None else now - dt.timedelta(minutes=minutes)
    assert sampler.activity_text(when, now) == text


# --- against a real agent -------------------------------------------------------------------------

lan = realclass.lan
agent = realclass.agent
real_class = realclass.real_class


@pytest.fixture
def real_sampler() -> Iterator[sampler.ClassSampler]:
    """The process's sampler on the real agent's socket, every 0.5 s."""
    interval = sampler.SAMPLER.interval
    sampler.SAMPLER.reset()
    sampler.SAMPLER.interval = 0.5
    try:
        yield sampler.SAMPLER
    finally:
        sampler.SAMPLER.reset()
        sampler.SAMPLER.interval = interval


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_a_students_server_stopped_reaches_the_teachers_grid_from_a_real_agent(
        channel_layer: str, real_class: realclass.RealClass,
        real_sampler: sampler.ClassSampler) -> None:
    from tests.panel.live.test_live_e2e_agent import agent_connections

    ann, ben = real_class.seat("ann"), real_class.seat("ben")
    assert ann.vserver is not None and ben.vserver is not None
    grid_path = f"/ws/classes/{real_class.classroom.customer.slug}/"
    cookie = session_cookie(real_class.users["teacher"])

    def stop_ann() -> None:
        assert ann.vserver is not None
        gactions.stop_vserver(ann.vserver, actor=real_class.actor("ann"))

    async def go() -> None:
        grids = [(await connect(grid_path, cookie))[0] for _ in range(3)]
        for g in grids:
            await g.send_json_to({"type": "watch-usage"})
        for g in grids:
            rows = {r["seat"]: r for r in (await messages_until(
                g, is_full_usage, timeout=30))[-1]["rows"]}
            for seat in (ann, ben):
                r = rows[seat.pk]
                assert r["running"] is True and r["cpu"] >= 0 and r["error"] is None, r
                assert 0 < r["memory"] < 128 * MIB and r["memory_mb"] == 128, r
        # Three grids, one sampler: one connection to the agent.
        assert agent_connections(real_class.agent) == 1
        await sync(stop_ann)()
        for g in grids:
            got = await messages_until(g, lambda m: m["type"] == "vserver" and m["vserver"][
                "status"] == "stopped", timeout=60)
            statuses = [m["vserver"]["status"] for m in got if m["type"] == "vserver"]
            # (Each message reads the server afresh: with the operation run inline,
            # "stopping" may be over before the grid's read; the browser test sees it.)
            assert set(statuses) <= {"stopping", "stopped"}, statuses
            assert {m["vserver"]["id"] for m in got if m["type"] == "vserver"} == {
                ann.vserver.pk}
            rows = {r["seat"]: r for r in (await messages_until(g, is_usage))[-1]["rows"]}
            assert rows[ann.pk]["running"] is False and rows[ann.pk]["cpu"] is None
            assert rows[ben.pk]["running"] is True
        for g in grids:
            await g.disconnect()
        assert real_sampler.tasks() == 0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while agent_connections(real_class.agent):
            assert loop.time() < deadline, "the sampler's connection outlived its watchers"
            await asyncio.sleep(0.05)

    run(go)

